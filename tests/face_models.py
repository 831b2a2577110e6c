"""The stand-in face models live in the package (the demo and the notebook need them too)."""
from mm_jax.testing.standin_faces import *  # noqa: F401,F403
from mm_jax.testing.standin_faces import KPS_OFFSETS  # noqa: F401
