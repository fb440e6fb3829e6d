import pytest
from loguru import logger


@pytest.fixture
def logged():
    """Every message logged (INFO and up) during the test, one string each."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)
