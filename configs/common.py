"""Fields every jaxgen config has; family config files start from `base_config()` and fill `model`, `data`, ...

Config files are Python: `get_config(arg)` takes the text after `file.py:` (e.g. `configs/mar_tiny.py:runlocal`), a
comma list of variants that every config checks with `parse_variants`.

Sections: `model` builds the family's module (strictly: every key a field), `loss` and the family keys of `sample`
build the family's settings; the other keys are read by the family-agnostic trainer, data, mesh and checkpoint code.
"""
from typing import Iterable, Optional, Set

import ml_collections

from jaxgen.errors import ConfigError


def parse_variants(arg: Optional[str], allowed: Iterable[str], config_name: str) -> Set[str]:
    """The comma-separated variants after `file.py:`; an unknown one is a ConfigError in one format for all configs."""
    allowed = tuple(allowed)
    chosen = {a.strip() for a in (arg or "").split(",") if a.strip()}
    bad = sorted(chosen - set(allowed))
    if bad:
        choices = f"choose from {', '.join(allowed)}" if allowed else "it takes none"
        raise ConfigError(f"unknown variant {', '.join(repr(b) for b in bad)} for configs/{config_name}.py: {choices} "
                          f"(comma separated after ':')")
    return chosen


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = ""
    c.seed = 0
    c.batch_size = 64  # global, across all processes
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 0  # 0: never during training

    # Numerics: params in param_dtype, matmuls/activations in compute_dtype; norms, softmax and losses in float32.
    c.compute_dtype = "float32"
    c.param_dtype = "float32"
    c.remat = False  # rematerialise each transformer block (jax.checkpoint)
    c.scan_layers = False
    c.attention_impl = "auto"  # auto | xla | cudnn

    c.model = ml_collections.ConfigDict()  # the family's module fields
    c.loss = ml_collections.ConfigDict()  # the family's loss settings (see its LossSettings)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-4  # peak learning rate (absolute); if blr > 0, lr = blr * batch_size / 256
    c.optim.blr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"  # constant | cosine | linear | lin0
    c.optim.warmup_steps = 0
    c.optim.warmup_init = 0.0  # fraction of peak lr at step 0
    c.optim.end_factor = 0.0  # final lr / peak for cosine / linear / lin0
    c.optim.grad_clip = 0.0  # global-norm clip; 0 = off
    c.optim.ema_decay = 0.0  # 0 = no EMA params
    c.optim.grad_accum = 1

    c.data = ml_collections.ConfigDict()
    # The dataset, named once: a tokenizer stage trains on the same one (config.tokenizer.data overrides fields).
    c.data.source = "digits"  # digits | tfds | imagefolder
    c.data.name = ""  # tfds dataset name
    c.data.split = "train"
    c.data.data_dir = ""  # tfds data_dir / image-folder root
    c.data.cache = False  # train on the tokenizer's codes of this dataset, encoded once (--mode=cache, automatic)
    c.data.cache_dir = ""  # where that cache lives; "" = <workdir>/code_cache
    c.data.image_size = 32
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.random_flip = False
    c.data.num_workers = 0  # grain multiprocessing workers (0 = in-process)
    c.data.prefetch = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp", "tensor")
    # logical axis -> mesh axes (None = replicated). Dims not divisible by the mesh size stay replicated.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("classes", None),
        ("conv_in", None),
        ("conv_out", "fsdp"),
        ("latent", None),
        ("norm", None),
        ("length", None),
        ("kv", None),
    )

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 0  # also keep every K-th step forever (0 = off)
    c.checkpoint.async_save = True

    c.sample = ml_collections.ConfigDict()
    c.sample.num_per_class = 100
    c.sample.batch_size = 100
    c.sample.use_ema = True
    c.sample.grid_per_class = 10  # samples of each class in grid.png (one row per class)

    # --mode=eval: N = data.num_classes x sample.num_per_class samples with the config.sample settings, in resumable
    # shards, scored by a feature extractor (jaxgen.eval); --mode=reference: statistics of the dataset for it.
    c.eval = ml_collections.ConfigDict()
    c.eval.metric = "digits"  # digits: the embedded digit classifier | inception: FID / IS of Inception-v3
    c.eval.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's), for inception
    # Reference statistics (.npz): ADM's VIRTUAL_imagenet256_labeled.npz, a pytorch-fid / torch-fidelity mu / sigma
    # file, or --mode=reference's output. "" with metric=digits: the 500 held-out test digits.
    c.eval.reference = ""
    c.eval.shard_size = 1000  # images per resumable shard (rounded up to a multiple of the sampling batch)
    c.eval.feature_batch = 100  # images per feature-extractor call (global, split over the mesh)
    c.eval.fid_method = "sqrtm"  # sqrtm: scipy, as pytorch-fid / ADM | eigh: the same trace ~5x faster (searches)
    c.eval.inception_score = "torch_fidelity"  # torch_fidelity (10 shuffled splits) | adm (splits of 5,000)
    c.eval.is_splits = 10  # torch_fidelity convention only
    c.eval.precision_recall = True  # ADM's improved precision / recall (needs reference features, not only mu / sigma)
    c.eval.pr_k = 3  # neighbourhood size of precision / recall (ADM: 3)
    c.eval.samples_npz = "jaxgen"  # jaxgen: samples/samples.npz (images, labels) | adm: arr_0 / arr_1 | none
    c.eval.reference_split = "train"  # --mode=reference: the split whose statistics it computes
    c.eval.reference_limit = 0  # --mode=reference: first N examples only (0: all)
    c.eval.reference_features = 10000  # --mode=reference: random examples whose features it keeps for precision / recall

    # --mode=search: tune the sampling knobs of config.sample on a trained model (jaxgen.search)
    c.search = ml_collections.ConfigDict()
    c.search.target = "policy"  # policy: the sampling knobs | beta: NAT's training Beta(a, b) (greedy line search)
    c.search.knobs = ()  # config.sample keys to tune; () = everything the family's search_space offers
    c.search.metric = "digit_fd"  # see jaxgen.search.metrics (lower is better)
    c.search.num_samples = 1000  # per evaluation, class-balanced, always the same labels and seed
    c.search.seed = 0
    c.search.updates = 10  # official AutoNAT: up to 100
    c.search.momentum = 0.5
    c.search.grad_clip = 0.0  # 0 = off (official --clip_grad, off by default)
    c.search.groups = ml_collections.ConfigDict()  # per-group finite-difference settings (official AutoNAT values)
    c.search.groups.ratio = ml_collections.ConfigDict(dict(delta=0.01, lr=1e-3, lo=0.0, hi=0.99))
    c.search.groups.scale = ml_collections.ConfigDict(dict(delta=0.1, lr=0.1, lo=1e-4, hi=1e9))
    c.search.train_steps = 400  # target=beta: steps of each candidate's short training run
    c.search.beta_step = 1.0  # target=beta: additive step of the line search
    c.search.beta_rounds = 2  # target=beta: passes over (a, b)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""  # a tokenizer run's workdir; "" = train one under <workdir>/tokenizer
    c.tokenizer.checkpoint = ""  # or a converted / explicit checkpoint path
    c.tokenizer.allow_training = True  # False (paper configs): without a checkpoint, stop instead of training one
    # The tokenizer stage's own values for fields of config.data (e.g. random_flip); the rest come from config.data.
    c.tokenizer.data = ml_collections.ConfigDict()
    return c


def imagenet_data(c, image_size: int = 256, folder: bool = False, random_flip: bool = True) -> None:
    """ImageNet (1000 classes, RGB) at `image_size`: TFDS `imagenet2012`, or an image folder (data.data_dir)."""
    c.data.source = "imagefolder" if folder else "tfds"
    c.data.name = "" if folder else "imagenet2012"
    c.data.split = "train"
    c.data.image_size = image_size
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = random_flip
    c.eval.metric = "inception"
    c.eval.samples_npz = "none"  # 50,000 images are 9.8 GB at 256 px: opt in with "adm" for external evaluators


def digits_data(c) -> None:
    """The bundled 32x32 one-channel MNIST digits (10 classes; not mirror-symmetric, so no flips)."""
    c.data.source = "digits"
    c.data.image_size = 32
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.random_flip = False
