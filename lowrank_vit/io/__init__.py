"""What leaves the process: the checkpoint format (safetensors and a JSON plan), ONNX export, the Hugging Face hub and
the model card."""
