"""Reports people look at: the HTML experiment review and the figures (training curves, evaluation trade-offs,
likelihood histograms), drawn from what ``ldm.tracking.query`` reads out of MLflow or from results in memory."""
