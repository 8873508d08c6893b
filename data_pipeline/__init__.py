"""k2train.data_pipeline: K2 tokenizer, corpus preparation into Megatron indexed datasets, and the loader.

Public entry points (import them from their modules; this package imports nothing so that the
tokenizer worker processes of ``prepare`` start without torch):

- ``tokenizer.K2Tokenizer``; ``train_tokenizer`` (command); ``embedded.embedded_tokenizer``
- ``prepare`` (command); ``indexed.IndexedDataset`` / ``IndexedDatasetWriter``
- ``loader.build_data_loader``, ``loader.check_vocab``, ``loader.load_tokenizer``

See docs/data.md.
"""
