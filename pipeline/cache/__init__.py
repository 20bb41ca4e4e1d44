"""Stage one's teacher cache: SAM run once per image, stored in a Zarr v3 store.

* :mod:`.fingerprint` - the cache identity and directory (``cache_dir``);
* :mod:`.quant` - float16 / per-channel int8 storage;
* :mod:`.pca` - channel reduction of wide levels (tree-reduced moments);
* :mod:`.prototypes` - class prototypes and ``cls_logits``;
* :mod:`.store` - the on-disk layout (``CacheStore``);
* :mod:`.record` - from a data sample to a stored record;
* :mod:`.runner` - ``build_cache`` on a dask cluster (resumable);
* :mod:`.reader` - ``TeacherCache`` for training;
* :mod:`.live` - ``LiveTeacher``, the same targets computed inline;
* :mod:`.inspect` - ``inspect_cache`` / ``verify_cache``.

Submodules are imported on demand (``from pipeline.cache.reader import TeacherCache``) so that
Snakemake's DAG-time ``cache_dir`` call does not pull in dask.
"""
