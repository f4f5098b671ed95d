"""Getting weights in and out: local safetensors folders, GGUF files, the Hugging Face hub,
the embedded default model (SmolLM2-135M-Instruct), and fourbit's own quantized checkpoints."""
