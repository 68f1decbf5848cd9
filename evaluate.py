"""python evaluate.py --help: score checkpoints on the dev sets, write prediction files, export. The program is
training/evaluate.py, installed as minbert.training.evaluate with the command minbert-evaluate."""
from minbert.training.evaluate import main

if __name__ == "__main__":
    main()
