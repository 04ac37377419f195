"""Fixed evaluation protocols: the settings two runs (or two papers) must share for their figures to compare.

FD, KID and PRDC depend on the feature network and its weights, on the sample size n (FD is biased
upwards at small n), on the bootstrap and on the seeds. A protocol fixes all of them; the report
names the protocol and every value it fixed.

    mriflow evaluate generation --real data/ixi2 --fake samples/ --out reports/x --protocol mriflow-v1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EvaluationProtocol:
    name: str
    split: str  # the real reference
    other_split: str  # the second real set (Real vs Real)
    backbone: str  # "anatomy": the shipped anatomy network of the data's grid
    n: int  # volumes drawn per set in each bootstrap round
    bootstrap: int  # rounds
    seed: int
    diversity_pairs: int  # MS-SSIM pairs per set
    description: str

    def settings(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    "mriflow-v1": EvaluationProtocol(
        name="mriflow-v1", split="test", other_split="val", backbone="anatomy", n=12, bootstrap=20, seed=0,
        diversity_pairs=50,
        description="the test split against generated volumes, Real vs Real against val; mriflow's anatomy network of "
                    "the grid (its SHA-256 in the report); 12 volumes per set and round (the IXI test split holds 15), "
                    "20 rounds without replacement, seed 0; 50 MS-SSIM pairs per set"),
}


def get_protocol(name: str) -> EvaluationProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol {name!r} is unknown; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
