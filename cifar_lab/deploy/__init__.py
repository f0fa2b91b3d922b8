"""A trained model leaving the lab: exported files and their runtime (:mod:`.exported`), its model card
(:mod:`.model_card`), and its accuracy under common corruptions (:mod:`.robustness`, :mod:`.corruptions`)."""
