"""Data: bundled digits, random-access sources (digits, image folder, tfds, a tokenizer's code cache) and grain
pipelines."""
from jaxgen.data.digits import load_digits
from jaxgen.data.pipeline import (build_source, iterate_dataset_once, make_eval_arrays,
                                  make_train_iterator)
from jaxgen.data.sources import (CachedCodesSource, CodeCacheWriter, DigitsSource, ImageFolderSource, TfdsSource,
                                 adm_center_crop, read_code_cache_meta, write_code_cache)

__all__ = [
    "load_digits", "build_source", "iterate_dataset_once", "make_eval_arrays", "make_train_iterator",
    "CachedCodesSource", "CodeCacheWriter", "DigitsSource", "ImageFolderSource", "TfdsSource",
    "adm_center_crop", "read_code_cache_meta", "write_code_cache",
]
