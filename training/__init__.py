"""The training side of minbert: options, the run folder and its checkpoints, the training step, evaluation,
data parallelism, masked-LM pre-training and sweeps. train.py is the fine-tuning program built from these."""
