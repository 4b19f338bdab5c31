r"""Sample the FLUX teacher with diffusers' FluxPipeline into a GenEval folder (default 28 steps, guidance 3.5).

Inference CLI (not a pytest file).  Example:
    python test_flux8b.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \
        --output_dir OUT/geneval --resolution 512
Multi-GPU: torchrun --nproc_per_node N test_flux8b.py ...   (see script/geneval_flux8b.sh)
Flags: python test_flux8b.py --help.  Shared code: model/sampling_cli.py.
"""
import sys

from model.sampling_cli import cli

if __name__ == "__main__":
    sys.exit(cli("teacher"))
