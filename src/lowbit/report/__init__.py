"""lowbit.report draws what it is given: the terminal tables (``table``: compare and eval; ``layers``, ``outliers``,
``bits``), the figures (``plots``, ``layer_plots``, on ``figure`` and ``plot_data``), the HTML page (``html``) and
the result JSON read back (``result_json``, checked against ``result_schema``)."""
