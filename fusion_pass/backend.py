def fusion_pass_backend(gm, example_inputs, **kw): raise NotImplementedError
