"""Dataset adapters: sources written in the dataset-directory format that `ltrec.data` loads.

`movielens` converts MovieLens-1M (the bundled default data), `photo_shop` builds a small shop
whose items carry real photos (`photo_shop_products` holds its catalogue); `commands` is their
command line (`python -m ltrec.datasets`).
"""
