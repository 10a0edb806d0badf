"""INT8 quantization: fake quantization for QAT (``fakequant``: the settings, BN folding and ``insert_fake_quant``;
``layers``: the fake-quantized layers; ``placement``: where the quantizers go on the fx graph), activation-range
calibration (``calibration``), the INT8 form a target gets (``form``) and mixed precision under an accuracy budget
(``mixed``)."""
