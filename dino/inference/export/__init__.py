"""Export a backbone to the runtimes people deploy on: ONNX, GGUF (dinov2.cpp / ggml) and Hugging Face `Dinov2Model`."""
