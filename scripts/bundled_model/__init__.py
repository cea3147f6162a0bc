"""The bundled default model's recipe, kept together: the corpus (`build_corpus`), the training run (`train`) and
the model card (`card`). The card's "Reproduce" section lists the commands in order."""
