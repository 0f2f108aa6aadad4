from cxrtune.health import HealthConfig, collapse_reason


def test_collapse_is_flagged_by_each_monitor_after_the_grace_period():
    cfg = HealthConfig(min_feature_std=0.05, min_effective_rank=4, max_mean_cosine=0.99, grace_epochs=2)
    healthy = {"feature_std": 0.3, "effective_rank": 120.0, "mean_cosine": 0.4}
    assert collapse_reason(healthy, cfg, epoch=5) is None
    assert collapse_reason({**healthy, "feature_std": 0.06 - 0.02}, cfg, epoch=5) == "feature_std 0.04 < 0.05"
    assert "effective_rank 1.5 < 4" == collapse_reason({**healthy, "effective_rank": 1.5}, cfg, epoch=5)
    assert "mean_cosine" in collapse_reason({**healthy, "mean_cosine": 0.999}, cfg, epoch=5)
    assert collapse_reason({**healthy, "feature_std": 0.0}, cfg, epoch=1) is None  # grace period
    # the train-mode std is preferred when the engine reports it
    assert collapse_reason({**healthy, "feature_std": 0.001, "feature_std_batch": 0.9}, cfg, epoch=5) is None
    assert "nan" in collapse_reason({**healthy, "feature_std": float("nan")}, cfg, epoch=3)


def test_zero_thresholds_disable_the_checks():
    cfg = HealthConfig(min_feature_std=0, min_effective_rank=0, max_mean_cosine=1, grace_epochs=0)
    assert collapse_reason({"feature_std": 0.0, "effective_rank": 1.0, "mean_cosine": 1.0}, cfg, 9) is None


def test_defaults_only_check_the_train_mode_std():
    cfg = HealthConfig()
    early_artefact = {"feature_std": 200.0, "feature_std_batch": 1.1, "effective_rank": 1.2, "mean_cosine": 0.99998}
    assert collapse_reason(early_artefact, cfg, epoch=3) is None
    assert "feature_std 0.001" in collapse_reason({**early_artefact, "feature_std_batch": 0.001}, cfg, epoch=3)
