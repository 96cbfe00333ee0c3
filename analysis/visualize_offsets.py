"""Sampled key positions per deformable stage on a few images (the paper's Figs. 5-7);
the same as `dat-lab visualize`.

    python analysis/visualize_offsets.py runs/digits_quick/version_0/checkpoints/last.ckpt [--images a.jpg b.jpg]
"""

import sys

import cli

if __name__ == "__main__":
    sys.exit(cli.main(["visualize", *sys.argv[1:]]))
