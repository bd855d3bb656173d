"""sfwatch: a folder that turns audio into text through SiliconFlow's transcription API."""

__version__ = "0.1.0"
