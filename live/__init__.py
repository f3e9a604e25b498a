"""The live avatar: speech streamed in, frames out (the streaming core, live sessions, file mode, WebRTC)."""
