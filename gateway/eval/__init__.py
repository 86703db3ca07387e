"""Offline eval, as LLaMA-Factory's ``do_predict``: ``datasets`` (its alpaca/sharegpt formats and
``dataset_info.json``), ``metrics`` (its BLEU-4/ROUGE), ``runner`` (every example through every model over the API),
``results`` (its output files), ``report`` (report.html), ``job`` (one ``gateway eval`` run)."""
