class VLan:
    nr: int
