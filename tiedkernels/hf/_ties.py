class TieReport:
    pass


def inspect_ties(model):
    raise NotImplementedError
