"""Datasets, served in seeded, augmented batches: held in memory as tensors, or streamed from disk.

Two sources: scikit-learn's ``digits`` (embedded: 1,797 8x8 grey images, no download) and an ImageFolder tree
(``root/<split>/<class>/*.jpg``). Every image file goes through one function (``decode_file``), whichever of the
two paths serves it:

- **In memory** (``DataBundle``, small sets): every image decoded once to one uint8 array, cached on disk keyed
  by the files' paths, sizes and times. Batches are normalized and augmented (random crop with reflect padding,
  horizontal flip) on whole tensors, which on a 2-core CPU is far cheaper than per-image transforms in workers.
- **Streamed** (``StreamingBundle``, above ``data.memory_limit_mb`` of decoded images, or
  ``data.streaming: true``): a DataLoader with worker processes decodes and augments each image on the fly, so
  memory does not grow with the data.

Both serve the same batches in the same order for a given seed and epoch, whatever the number of workers, and a
rank of a distributed run can take its shard of every global batch (``shard=(rank, world)``).

Which module holds what (each imports only those above it):

- ``batches``: the ``Batches`` interface the stages read, the in-memory ``DataBundle``, and the shared order
  (``epoch_order``, ``batch_starts``, ``shard_of``, ``class_spread``).
- ``digits``: the digits set as a ``DataBundle``.
- ``decode_cache``: the on-disk cache of decoded images and file checks (its folder, key, writes, clearing).
- ``imagefolder``: an ImageFolder split: listing (``list_split``), decoding one file (``decode_file``,
  ``to_channels``), decoding a whole split into memory (``decode_split``), the unreadable-file handling.
- ``streaming``: ``ImageFiles`` and ``StreamingBundle``, the one-time check of a streamed split, the choice to
  stream and the default number of DataLoader workers.
- ``loading``: the entry points: ``load_data``, ``run_data``, ``data_fingerprint``, ``teacher_channels``.
- ``bench``: the data-path benchmark (``python -m edgepipe.data.bench``).
"""
