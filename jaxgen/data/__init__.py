"""Data: bundled digits, random-access sources (digits, image folder, tfds, latent cache) and grain pipelines."""
from jaxgen.data.digits import load_digits
from jaxgen.data.pipeline import (build_source, iterate_dataset_once, make_eval_arrays,
                                  make_train_iterator)
from jaxgen.data.sources import (CachedLatentsSource, DigitsSource, ImageFolderSource, LatentCacheWriter,
                                 TfdsSource, adm_center_crop, read_latent_cache_meta, write_latent_cache)

__all__ = [
    "load_digits", "build_source", "iterate_dataset_once", "make_eval_arrays", "make_train_iterator",
    "CachedLatentsSource", "DigitsSource", "ImageFolderSource", "LatentCacheWriter", "TfdsSource",
    "adm_center_crop", "read_latent_cache_meta", "write_latent_cache",
]
