"""mm_jax: Magic Mirror on CogVideoX in JAX/Flax NNX."""
from mm_jax._compat import sentencepiece_proto_fallback as _sentencepiece_proto_fallback

_sentencepiece_proto_fallback()
