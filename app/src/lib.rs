//! Z-Image Studio library (UI, engine bridge, state).
