"""Getting features out of a trained backbone, fast: extraction, retrieval and export.

- `extract`: images (folder or file list) → feature matrix + paths, resumable, corrupt files listed;
- `search`: nearest neighbours (FAISS or torch) and near-duplicate pairs over extracted features;
- `fast`: an inference copy of a v1/v2/v3 ViT (folded LayerScale, cached position embedding or RoPE tables,
  bf16 / int8 / torch.compile options) with the same outputs; ConvNeXts run their own forward;
- `onednn`: the private oneDNN operators `fast` fuses with, behind a schema and result check;
- `export`: ONNX, GGUF (dinov2.cpp; v1/v2 only) and Hugging Face (`Dinov2Model`, `DINOv3ViTModel`) files.
"""
