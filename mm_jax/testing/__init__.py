"""Offline stand-ins used by the demo, the notebook's tiny mode and the tests: tiny ONNX face models
with insightface's input/output contracts, and tiny random checkpoints. Nothing here downloads."""
