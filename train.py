"""python train.py --help: multi-task fine-tuning of minbert (and masked-LM pre-training, sweeps). The program,
top to bottom, is training/train.py, installed as minbert.training.train with the command minbert-train."""
from minbert.training.train import main

if __name__ == "__main__":
    main()
