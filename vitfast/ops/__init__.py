"""Functional ops: one op per file, each a reference, torch.library ops, autograd and a public function."""
