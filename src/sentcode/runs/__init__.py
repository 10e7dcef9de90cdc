"""Reading run directories: configs, weights and stage artefacts, for training, evaluation and inference
alike. Below ``train/``: loading a run for inference imports nothing of training."""
