"""INT8 quantization: fake quantizers for QAT (``fakequant``), activation-range calibration (``calibration``), the
INT8 form a target gets (``form``) and mixed precision under an accuracy budget (``mixed``)."""
