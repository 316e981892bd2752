"""Images out: make_shards, an image folder or list file packed into WebDataset shards (listing, keys,
reading source files, writing tars), resumable like the token jobs. It sits beside `data/`, whose
content checks it reuses; nothing else in `pipeline/` imports it."""
