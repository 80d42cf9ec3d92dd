"""Label feedback over HTTP: stored durably beside the models, counted, and used by calibrate."""

from __future__ import annotations

import json

import numpy as np

from tests.service.conftest import bars, blobs, running_app


def _pixels(images: np.ndarray) -> list:
    return np.rint(images * 255).astype(int).tolist()


def test_feedback_is_stored_counted_and_recalibrates(models_copy):
    records = ([{"image": img, "label": "normal", "source": "test"}
                for img in _pixels(blobs(40, seed=70))]
               + [{"image": img, "label": "anomaly"} for img in _pixels(bars(5, seed=70))]
               + [{"id": "req-1/0", "label": "normal"}])
    with running_app(models_copy) as client:
        r = client.post("/v1/models/blobs/feedback", json={"records": records})
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "blobs", "stored": 46,
                            "labels": {"normal": 41, "anomaly": 5}}
        metrics = client.get("/metrics").text
    assert 'anomaly_feedback_records_total{label="normal",model="blobs"} 41.0' in metrics
    files = list((models_copy / "_feedback" / "blobs").glob("*.jsonl"))
    assert len(files) == 1
    lines = files[0].read_text().splitlines()
    assert len(lines) == 46 and json.loads(lines[-1])["id"] == "req-1/0"

    from anomaly.recalibrate import run_calibrate

    out = run_calibrate(models_copy / "blobs" / "v2", feedback=True, force=True)
    assert out.n_normal == 40 and out.n_anomalies == 5  # the id-only record cannot be rescored
    assert out.path.parent == models_copy / "blobs"
    assert {"f1-max", "youden"} <= set(out.lineage["added"])
    assert out.lineage["data"][-1] == {"kind": "feedback", "n_normal": 40, "n_anomalies": 5}


def test_bad_feedback_gets_a_4xx_and_nothing_is_stored(models_copy):
    with running_app(models_copy) as client:
        for body, code, status in (
                ({"records": [{"label": "maybe", "id": "x"}]}, "validation_error", 422),
                ({"records": []}, "validation_error", 422),
                ({"records": [{"label": "normal"}]}, "validation_error", 422),  # no id or image
                ({"records": [{"label": "normal", "image": [[300]]}]}, "invalid_feedback", 422),
                ({"records": [{"label": "normal", "id": "x", "colour": 1}]},
                 "validation_error", 422)):
            r = client.post("/v1/models/blobs/feedback", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["code"] == code, r.text
        r = client.post("/v1/models/nope/feedback", json={"records": [{"label": "normal",
                                                                        "id": "x"}]})
        assert r.status_code == 404
    assert not (models_copy / "_feedback" / "blobs").exists()


def test_feedback_is_an_admin_route(models_copy):
    with running_app(models_copy, admin_open=False) as client:
        r = client.post("/v1/models/blobs/feedback", json={"records": [{"label": "normal",
                                                                        "id": "x"}]})
        assert r.status_code == 403, r.text
    with running_app(models_copy, admin_api_keys=["adm"]) as client:
        body = {"records": [{"label": "normal", "id": "x"}]}
        assert client.post("/v1/models/blobs/feedback", json=body).status_code == 401
        r = client.post("/v1/models/blobs/feedback", json=body,
                        headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200, r.text
