"""Convert official PyTorch weights into a jaxgen params checkpoint (no PyTorch needed).

  python -m jaxgen.convert --family=mar --config=configs/mar_l.py --input=checkpoint-last.pth --output=weights/mar_l
  python -m jaxgen.convert --family=kl_vae --config=configs/kl16.py --input=kl16.ckpt --output=weights/kl16
  python -m jaxgen.convert --family=nat --config=configs/autonat_l.py --input=nnet_ema.pth --output=weights/autonat_l
  python -m jaxgen.convert --family=mage_vqgan --config=configs/maskgit_vqgan.py --input=vqgan_jax_strongaug.ckpt \
      --output=weights/mage_vqgan

The output directory is what `--workdir` (sample/eval), `config.init_from` (fine-tuning) and
`config.tokenizer.checkpoint` accept.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional

import jax
import numpy as np

from jaxgen import config as config_lib
from jaxgen.errors import UserError

# family -> (converter "module:function", which checkpoint entries hold weights (tried in order; None = the file is
# the state dict itself), ema entry)
CONVERTERS = {
    "mar": ("jaxgen.convert.mar:convert_mar", ("model", None), "model_ema"),
    "kl_vae": ("jaxgen.convert.kl_vae:convert_kl_vae", ("model", "state_dict", None), None),
    "var": ("jaxgen.convert.var:convert_var", (None,), None),
    "msvq": ("jaxgen.convert.var:convert_vqvae", (None,), None),
    "rar": ("jaxgen.convert.rar:convert_rar", (None, "model"), None),
    "maskgit_vqgan": ("jaxgen.convert.maskgit_vqgan:convert_maskgit_vqgan", (None, "model"), None),
    # MAGE's VQGAN (AutoNAT's tokenizer, taming names) into the MaskGIT-VQGAN layout
    "mage_vqgan": ("jaxgen.convert.maskgit_vqgan:convert_mage_vqgan", (None, "state_dict"), None),
    # AutoNAT nnet_ema.pth (backbone 'uvit') or an original MaskGIT flax checkpoint (backbone 'maskgit')
    "nat": ("jaxgen.convert.nat:convert_nat", (None, "params"), None),
}


def _converter(family: str):
    if family not in CONVERTERS:
        raise UserError(f"no converter for family {family!r}; available: {', '.join(sorted(CONVERTERS))}")
    path, selects, ema = CONVERTERS[family]
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn), selects, ema


def _load(path: str, select: Optional[str]):
    from jaxgen.convert.io import load_state_dict

    return load_state_dict(path, select=select)


def _read_state_dicts(path: str, selects, ema_key: Optional[str], only: Optional[str]):
    """(weights, ema weights or None). `only` forces one entry (e.g. 'model_ema')."""
    if only:
        return _load(path, only), None
    last_err = None
    for sel in selects:
        try:
            sd = _load(path, sel)
            break
        except UserError as e:
            last_err = e
        except (KeyError, ValueError) as e:
            last_err = e
    else:
        raise UserError(str(last_err))
    ema = None
    if ema_key:
        try:
            ema = _load(path, ema_key)
        except (UserError, KeyError, ValueError):
            ema = None
    return sd, ema


def convert(family: str, config, input_path: str, output_dir: str, select: Optional[str] = None) -> str:
    """Read `input_path`, map it onto the params of `config`'s model, check every shape, write `output_dir`."""
    from jaxgen import families
    from jaxgen.convert.torch_layout import check_tree_shapes
    from jaxgen.train import export, restore

    if not os.path.exists(input_path):
        raise UserError(f"input file {input_path} does not exist; pass the official checkpoint path with --input")
    fn, selects, ema_key = _converter(family)
    fam = families.build(config)  # the config is checked before the (possibly large) file is read
    sd, ema_sd = _read_state_dicts(input_path, selects, ema_key, select)
    try:
        params = fn(sd, config)
    except (ValueError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"{input_path} does not fit --family={family} with --config: {msg[:400]}; is it a {family} "
                        f"checkpoint, and the config the model it was trained with?") from None
    reference = restore.abstract_params(fam)
    try:
        check_tree_shapes(params, reference, what=f"converted {family} weights")
    except ValueError as e:
        raise UserError(f"{e}; is --config the model the checkpoint was trained with?") from None
    ema = fn(ema_sd, config) if ema_sd is not None else None
    export.save_params(output_dir, params, ema, {"family": family, "source": os.path.abspath(input_path),
                                                 "ema": ema is not None})
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    logging.info("wrote %s (%s parameters%s)", output_dir, f"{n:,}", ", + EMA" if ema is not None else "")
    return output_dir


def main(argv=None):
    parser = _OneLineErrors(prog="python -m jaxgen.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("--config", required=True, help="config file of the model, e.g. configs/mar_l.py")
    parser.add_argument("--input", required=True, help=".pth / .ckpt / .npz / .safetensors")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--select", default=None, help="checkpoint entry to convert (e.g. model_ema); default: all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.family, config_lib.load(args.config), args.input, args.output, args.select)
    except UserError as e:
        sys.stderr.write(f"jaxgen: error: {' '.join(str(e).split())}\n")
        return 2
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"jaxgen: error: {message} (see python -m jaxgen.convert --help)\n")
        sys.exit(2)


def entry():
    sys.exit(main())
