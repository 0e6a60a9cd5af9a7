

def test_low_precision_autocast_keeps_the_estimate_in_float32(bn_model):
    from bnadapt.runs import autocast

    for est in ("ema", "window", "prior"):
        s = stream_adapt(bn_model, None if est == "prior" else 0.7, estimator=est, momentum=0.2, prior_n=4)
        with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
            outs = [s(x) for x in batches()]
        assert all(torch.isfinite(o).all() for o in outs)
        layer = s.net.bn
        assert layer._st is None or layer._st[0].dtype == torch.float32
