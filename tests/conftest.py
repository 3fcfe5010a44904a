import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread: tiny models gain nothing from more, and subprocess tests must not oversubscribe
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ldm-cache"))


def _built(tmp_path_factory, name, make):
    from tests import tiny_models

    folder = tmp_path_factory.getbasetemp() / "models" / name
    if not (folder / "model_index.json").exists():
        tiny_models.save(make(), folder)
    return folder


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sd1", lambda: tiny_models.sd_pipeline("sd1"))


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sd2-v", lambda: tiny_models.sd_pipeline("sd2"))


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sdxl", tiny_models.sdxl_pipeline)


@pytest.fixture(scope="session")
def sd1_inpaint_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sd1-inpaint", lambda: tiny_models.sd_pipeline("sd1", inpainting=True))


@pytest.fixture(scope="session")
def sdxl_inpaint_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sdxl-inpaint", lambda: tiny_models.sdxl_pipeline(inpainting=True))


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sd3", lambda: tiny_models.sd3_pipeline("sd3"))


@pytest.fixture(scope="session")
def sd35_medium_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-sd35-medium", lambda: tiny_models.sd3_pipeline("sd35-medium"))


@pytest.fixture(scope="session")
def flux_dev_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-flux-dev", lambda: tiny_models.flux_pipeline("dev"))


@pytest.fixture(scope="session")
def flux_schnell_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-flux-schnell", lambda: tiny_models.flux_pipeline("schnell"))


@pytest.fixture(scope="session")
def chroma_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-chroma", tiny_models.chroma_pipeline)


@pytest.fixture(scope="session")
def zimage_turbo_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-zimage-turbo", lambda: tiny_models.zimage_pipeline())


@pytest.fixture(scope="session")
def flux2_klein_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-flux2-klein", lambda: tiny_models.flux2_klein_pipeline(distilled=True))


@pytest.fixture(scope="session")
def flux2_klein_base_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-flux2-klein-base", lambda: tiny_models.flux2_klein_pipeline(distilled=False))


@pytest.fixture(scope="session")
def flux2_dev_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-flux2-dev", tiny_models.flux2_dev_pipeline)


@pytest.fixture(scope="session")
def qwen_image_folder(tmp_path_factory):
    from tests import tiny_models

    return _built(tmp_path_factory, "tiny-qwen-image", lambda: tiny_models.qwen_image_pipeline())
