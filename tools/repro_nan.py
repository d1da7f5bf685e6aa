import torch, fp4.functional as F
A = torch.randn(300); A[77] = float("nan")
try:
    F.quantize_4bit(A)
except ValueError as e:
    print("raised:", e)
