"""Engine modules shared by the steps (models, templates, generation, ONNX, the gate, ...); a step
imports these and pipelines.base, never another step."""
