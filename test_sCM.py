r"""Sample an sCM FLUX student into a GenEval folder (default 2 steps, guidance 4.5).

Inference CLI (not a pytest file).  Example:
    python test_sCM.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B --resume_path OUT/ckpts/transformer_1000.pt \
        --output_dir OUT/geneval --resolution 512
Multi-GPU: torchrun --nproc_per_node N test_sCM.py ...   (see script/geneval_sCM.sh)
Flags: python test_sCM.py --help.  Shared code: model/sampling_cli.py.
"""
import sys

from model.sampling_cli import cli

if __name__ == "__main__":
    sys.exit(cli("scm"))
