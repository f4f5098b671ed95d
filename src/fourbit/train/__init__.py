"""Fine-tuning: instruction data (formats, chat templates, label masking, packing), the recipe,
checkpoints, and the built-in demo task."""
