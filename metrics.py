"""CLIP score of the stock and fine-tuned models on fixed prompts and seeds. Flags: python metrics.py --help"""

from sdtune.evaluate import main

if __name__ == "__main__":
    main()
