"""Exports of a tuned adapter: the plugged model (safetensors, ONNX) or the adapter alone (PEFT, layers), each
with a manifest signed by the coordinator."""
