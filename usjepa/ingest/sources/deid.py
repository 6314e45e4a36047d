"""De-identification: a secret salt kept outside the shard folder, salted pseudonyms, which
identifying DICOM attributes a file carried (names only), and path components scrubbed of
identifiers (docs/data.md#de-identification)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from usjepa.errors import UserError

SALT_BYTES = 32
SALT_ENV = "USJEPA_DEID_SALT"
PSEUDONYM_HEX = 16

# short prefixes of the pseudonyms per kind; other kinds ([a-z][a-z0-9]*) are used as given
KIND_PREFIX = {"patient": "pat", "study": "stu", "series": "ser", "file": "file", "video": "vid", "path": "id"}

# DICOM keywords of attributes that identify a person, a place, a device or an examination
# (a working subset of the PS3.15 E.1-1 basic profile: names, ids, dates and times, UIDs,
# addresses, free text about the patient). Sample metadata never carries any of them.
IDENTIFYING_TAGS: tuple[str, ...] = tuple(
    """
    PatientName PatientID IssuerOfPatientID OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
    PatientBirthName PatientMotherBirthName PatientBirthDate PatientBirthTime PatientSex PatientAge PatientAddress
    PatientTelephoneNumbers PatientComments AdditionalPatientHistory MedicalRecordLocator EthnicGroup Occupation
    MilitaryRank InstitutionName InstitutionAddress InstitutionalDepartmentName ReferringPhysicianName
    ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers PerformingPhysicianName PhysiciansOfRecord
    NameOfPhysiciansReadingStudy RequestingPhysician OperatorsName StationName DeviceSerialNumber AccessionNumber
    StudyID StudyInstanceUID SeriesInstanceUID SOPInstanceUID MediaStorageSOPInstanceUID FrameOfReferenceUID
    StudyDescription SeriesDescription RequestAttributesSequence StudyDate SeriesDate AcquisitionDate ContentDate
    InstanceCreationDate AcquisitionDateTime StudyTime SeriesTime AcquisitionTime ContentTime InstanceCreationTime
    """.split()
)

# values of these are too short or too generic (free-text descriptions such as "BREAST")
# to look for inside path components
_NOT_SEARCHED_IN_PATHS = set(
    """
    PatientSex PatientAge PatientComments AdditionalPatientHistory EthnicGroup Occupation MilitaryRank
    StudyDescription SeriesDescription
    """.split()
)
_KIND_OK = re.compile(r"^[a-z][a-z0-9]*$")


# ---------------------------------------------------------------------------- salt
def default_salt_path() -> Path:
    """$USJEPA_DEID_SALT, else ~/.config/usjepa/deid-salt (per user, outside any shard folder)."""
    env = os.environ.get(SALT_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "usjepa" / "deid-salt"


def check_salt_location(path, output_dir) -> None:
    """UserError when the salt file would sit inside `output_dir` (shards are shared; the salt
    must not be)."""
    salt = Path(path).expanduser().absolute().resolve()
    out = Path(output_dir).expanduser().absolute().resolve()
    if salt.is_relative_to(out):
        raise UserError(
            f"de-identification salt file {salt} lies inside the output folder {out}, which gets shared "
            f"with the shards; keep the salt elsewhere, e.g. --salt {default_salt_path()} (or set ${SALT_ENV})"
        )


def load_or_create_salt(path=None, output_dir=None) -> bytes:
    """The secret salt in `path` (default `default_salt_path()`); on first use a new random
    32-byte salt is written there with mode 600. Refuses (UserError) a path inside
    `output_dir` and a file that is not a salt (wrong size, a folder, unreadable)."""
    path = Path(path).expanduser().absolute() if path is not None else default_salt_path().absolute()
    if output_dir is not None:
        check_salt_location(path, output_dir)
    if path.is_dir():
        raise UserError(f"de-identification salt path {path} is a folder; give a file path, e.g. {path / 'deid-salt'}")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created concurrently: read that one
        except OSError as exc:
            raise UserError(
                f"cannot create the de-identification salt file {path} ({exc.strerror}); choose a writable path "
                f"outside the shard folder (or set ${SALT_ENV})"
            ) from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SALT_BYTES))
                f.flush()
                os.fsync(f.fileno())
    try:
        salt = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"cannot read the de-identification salt file {path} ({exc.strerror}); check its permissions"
        ) from None
    if len(salt) != SALT_BYTES:
        raise UserError(
            f"de-identification salt file {path} holds {len(salt)} bytes, not {SALT_BYTES}; it is not a salt "
            "made by usjepa: point to the right file, or move this one away to create a new salt (pseudonyms change)"
        )
    return salt


def salt_id(salt: bytes) -> str:
    """A short public fingerprint of the salt (for manifests: which salt made these
    pseudonyms); reveals nothing usable about the salt itself."""
    return hashlib.sha256(b"usjepa-salt-id\0" + salt).hexdigest()[:12]


# ---------------------------------------------------------------------------- pseudonyms
def pseudonym(salt: bytes, kind: str, value) -> str:
    """'<prefix>-' + the first 16 hex digits of HMAC-SHA256(salt, kind + value), e.g.
    pseudonym(salt, "patient", "PID-1") -> 'pat-3f2a9c1e0b7d4a65'. Surrounding whitespace of
    the value is ignored (DICOM pads values with spaces)."""
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < 16:
        raise ValueError("salt must be at least 16 bytes (use load_or_create_salt)")
    if not _KIND_OK.match(kind):
        raise ValueError(f"pseudonym kind {kind!r} must match [a-z][a-z0-9]*")
    message = f"{kind}\0{str(value).strip()}".encode()
    digest = hmac.new(bytes(salt), message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]
    return f"{KIND_PREFIX.get(kind, kind)}-{digest}"


# ---------------------------------------------------------------------------- DICOM reports
def _has_value(container, keyword: str) -> bool:
    if container is None or keyword not in container:
        return False
    elem = container[keyword]
    try:
        return not elem.is_empty
    except Exception:  # a value pydicom cannot parse still counts as present
        return True


def removed_report(ds) -> dict:
    """What identifying content a DICOM dataset carried (none of it is kept): the keywords
    of `IDENTIFYING_TAGS` present with a value (top level and file meta), and the number of
    private attributes. Names and counts only, never values."""
    meta = getattr(ds, "file_meta", None)
    present = sorted(k for k in IDENTIFYING_TAGS if _has_value(ds, k) or _has_value(meta, k))
    private = sum(1 for elem in ds if elem.tag.is_private)
    return {"identifying_tags": present, "private_tags": private}


PART = ":part"


def identifying_values(ds) -> dict[str, list[str]]:
    """{keyword: [text values]} of the identifying attributes of `ds` (for scrubbing paths
    and for tests; never store the result). Person names also give their components under
    '<keyword>:part' (e.g. 'PatientName:part': ['Doe', 'Jane'])."""
    found: dict[str, list[str]] = {}
    meta = getattr(ds, "file_meta", None)
    for keyword in IDENTIFYING_TAGS:
        for container in (ds, meta):
            if not _has_value(container, keyword):
                continue
            try:
                value = container[keyword].value
            except Exception:
                continue
            if keyword.endswith("Sequence"):
                continue
            several = isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
            values = list(value) if several else [value]
            texts, parts = [], []
            for v in values:
                text = str(v).strip()
                if text:
                    texts.append(text)
                if type(v).__name__ == "PersonName":
                    parts.extend(p.strip() for p in re.split(r"[\^=]", str(v)) if p.strip())
            if texts:
                found.setdefault(keyword, []).extend(texts)
            if parts:
                found.setdefault(keyword + PART, []).extend(parts)
    return found


# ---------------------------------------------------------------------------- paths
def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.casefold())


class PathScrubber:
    """Pseudonymises relative paths: a component that equals or contains an identifying
    value is replaced. A component equal to the patient id becomes the patient's pseudonym
    (a patient folder stays one folder); any other matching component becomes
    '<patient pseudonym or id>-<8 hex of its salted hash>' plus its extension when that is
    a plain one ('.dcm'), so distinct names stay distinct."""

    def __init__(self, salt: bytes, min_len: int = 3):
        self.salt = salt
        self.min_len = min_len

    def _needles(self, values: dict[str, Iterable[str]]) -> list[tuple[str, str]]:
        needles = []
        for keyword, texts in values.items():
            if keyword.removesuffix(PART) in _NOT_SEARCHED_IN_PATHS:
                continue
            for text in texts:
                for form in {text.casefold(), _norm(text)}:
                    # the patient id is looked for at any length ("equals or contains")
                    if form and (keyword == "PatientID" or len(form) >= self.min_len):
                        needles.append((keyword, form))
        return needles

    @staticmethod
    def _hit(needles, folded: str, normed: str, tokens_only: bool) -> bool:
        tokens = set(re.findall(r"[0-9a-z]+", folded)) if tokens_only else set()
        for keyword, n in needles:
            if tokens_only and keyword.endswith(PART):  # 'Ben' (a name part) must not hit 'benign'
                if n in tokens:
                    return True
            elif n in folded or (n.isalnum() and n in normed):
                return True
        return False

    def names_identifier(self, component: str, patient_id: str = "", values=None) -> bool:
        """Whether a folder name is an identifier of the files inside (for telling patient
        folders from class folders); name parts count only as whole words here."""
        values = dict(values or {})
        if patient_id:
            values.setdefault("PatientID", [patient_id])
        if patient_id and component.strip() == patient_id.strip():
            return True
        return self._hit(self._needles(values), component.casefold(), _norm(component), tokens_only=True)

    def scrub(self, relative: str, patient_id: str = "", values: dict[str, Iterable[str]] | None = None) -> str:
        """`relative` ('/'-separated) with identifying components replaced; `patient_id` is
        the file's PatientID (gives the pseudonym), `values` its identifying values."""
        values = dict(values or {})
        if patient_id:
            values.setdefault("PatientID", [patient_id])
            if patient_id not in values["PatientID"]:
                values["PatientID"] = [patient_id, *values["PatientID"]]
        needles = self._needles(values)
        patient = pseudonym(self.salt, "patient", patient_id) if patient_id else ""
        out = []
        for comp in PurePosixPath(relative).parts:
            folded, normed = comp.casefold(), _norm(comp)
            exact = patient_id and comp.strip() == patient_id.strip()
            hit = exact or self._hit(needles, folded, normed, tokens_only=False)
            if not hit:
                out.append(comp)
            elif exact:
                out.append(patient)
            else:
                suffix = PurePosixPath(comp).suffix
                keep = (
                    suffix
                    if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix or "")
                    and not any(n in suffix.casefold() for _, n in needles)
                    else ""
                )
                tag = pseudonym(self.salt, "path", comp).split("-", 1)[1][:8]
                out.append(f"{patient or 'id'}-{tag}{keep}")
        return "/".join(out)
