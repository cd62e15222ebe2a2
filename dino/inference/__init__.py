"""Getting features out of a trained backbone, fast: extraction, retrieval and export.

- `extract`: images (folder or file list) → feature matrix + paths, resumable, corrupt files listed;
- `search`: nearest neighbours (FAISS or torch) and near-duplicate pairs over extracted features;
- `fast`: an inference copy of a `VisionTransformer` (folded LayerScale, cached position embedding,
  bf16 / int8 / torch.compile options) with the same outputs;
- `export`: ONNX, GGUF (dinov2.cpp) and Hugging Face `Dinov2Model` files.
"""
