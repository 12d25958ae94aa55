"""The synthetic clinic's vocabulary: column lists, names, places, services, statuses, sources.

Why: every other ``etl.synth`` module draws from these fixed tables, and the tests read the
column lists and name tables directly. The columns are the generic profile of SPEC section 3
(``shared/SPEC.md``); the spellings of statuses, consent flags and test records are the edge
cases of SPEC sections 3 and 4 that ``write_synthetic_clinic`` lists. The people are fake: fixed
lists of common names, numbered addresses at common mail domains, generated phone numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Strings = Any  # a pyarrow string array (pyarrow ships no type stubs)
Chars = npt.NDArray[np.uint8]

TIMEZONE = "America/Los_Angeles"
APPOINTMENT_COLUMNS = (
    "appointment_id", "patient_id", "first_name", "last_name", "email", "phone", "zip", "city",
    "state", "country", "service", "status", "start_at", "revenue", "currency", "location_id",
    "updated_at", "consent_marketing", "consent_at", "consent_revoked_at",
)  # fmt: skip
LEAD_COLUMNS = (
    "lead_id", "created_at", "first_name", "last_name", "email", "phone", "zip", "gclid", "gbraid",
    "wbraid", "fbclid", "fbc", "fbp", "consent_marketing", "consent_at", "consent_revoked_at",
    "source", "treatment_interest", "notes", "landing_page_url",
)  # fmt: skip

_DAY = 86_400
_SPAN_DAYS = 456  # about 15 months before `end`

_FIRST = (
    "Sarah", "Jessica", "Emily", "Ashley", "Jennifer", "Amanda", "Melissa", "Michelle", "Nicole",
    "Stephanie", "Elizabeth", "Lauren", "Megan", "Rachel", "Samantha", "Maria", "Laura", "Heather",
    "Rebecca", "Christina", "Kimberly", "Amy", "Angela", "Lisa", "Karen", "Linda", "Susan",
    "Olivia", "Emma", "Sophia", "Isabella", "Chloe", "Grace", "Hannah", "Natalie", "Victoria",
    "Priya", "Mei", "Ana", "Camila", "Valentina", "Fatima", "Aisha", "Yuki", "Michael", "David",
    "James", "Daniel", "Kevin", "Brian", "Jason", "Ryan", "Mary Ann", "José", "Zoë", "Anne-Marie",
    "Renée", "Tess",
)  # fmt: skip
_LAST = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark",
    "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres",
    "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Rivera", "Campbell", "Kim",
    "Patel", "Chen", "Wang", "Singh", "O'Brien", "Smith-Jones", "De La Cruz", "Núñez", "Testa",
)  # fmt: skip
# test-record names sit after the real ones so a person's kind picks them by index
_TEST_FIRST = ("Test", "TEST", "Do Not Use")
_TEST_LAST = ("Patient", "Do Not Use", "test")
_DOMAINS = (
    ("gmail.com", 0.42), ("yahoo.com", 0.16), ("icloud.com", 0.12), ("outlook.com", 0.1),
    ("hotmail.com", 0.08), ("aol.com", 0.04), ("comcast.net", 0.04), ("sbcglobal.net", 0.04),
)  # fmt: skip
_TEST_DOMAINS = ("example.com", "test.com")
_GMAIL = 0
_PLUS_TAGS = ("spa", "botox", "promo", "2025", "deals")
_AREAS = (
    209, 213, 310, 323, 408, 415, 424, 510, 530, 559, 562, 619, 626, 650, 657, 661, 669, 707, 714,
    747, 760, 805, 818, 831, 858, 909, 916, 925, 949, 951,
)  # fmt: skip
_ZIPS = (
    ("94103", "San Francisco"), ("94110", "San Francisco"), ("94117", "San Francisco"),
    ("94607", "Oakland"), ("94610", "Oakland"), ("94704", "Berkeley"), ("95112", "San Jose"),
    ("94301", "Palo Alto"), ("90026", "Los Angeles"), ("90401", "Santa Monica"),
    ("91101", "Pasadena"), ("92618", "Irvine"), ("92101", "San Diego"), ("94941", "Mill Valley"),
)  # fmt: skip
_LOCATIONS = ("SR-SF-01", "SR-OAK-02", "SR-SJ-03")
# name, price in cents, weight; the names are PHI on purpose (conditions, body areas, drugs)
_SERVICES = (
    ("Botox - Forehead & Glabella", 45000, 12), ("Botox for hyperhidrosis (underarms)", 120000, 3),
    ("Dysport - Crow's Feet", 38000, 5), ("Lip Filler (Juvederm Ultra, 1 syringe)", 75000, 7),
    ("Cheek Filler - Voluma", 85000, 4), ("Sculptra", 90000, 2), ("Hydrafacial", 22500, 10),
    ("Chemical Peel - melasma", 17500, 4), ("Microneedling with PRP", 60000, 5),
    ("Laser Hair Removal - Bikini", 25000, 6), ("IPL Photofacial - rosacea", 35000, 4),
    ("CoolSculpting - Abdomen", 150000, 3), ("Morpheus8 - acne scars", 110000, 3),
    ("Kybella - Chin", 65000, 2), ("Semaglutide weight loss - monthly", 39900, 5),
    ("PRP Hair Restoration - alopecia", 80000, 2), ("Tattoo Removal", 30000, 2),
    ("Consultation", 0, 10), ("Weight loss consultation (semaglutide, BMI 32)", 0, 3),
    ("Botox touch-up", 0, 3), ('"VIP" Glow Package', 95000, 1),
)  # fmt: skip
_SERVICE_NAMES = tuple(s[0] for s in _SERVICES) + tuple(f"Refund - {s[0]}" for s in _SERVICES)
_SERVICE_PRICE = np.array([s[1] for s in _SERVICES], dtype=np.int64)

_ATT, _CANC, _LATE, _NOSHOW, _RESCHED, _SCHED, _UNKNOWN = range(7)
_STATUSES = (
    ("completed", "Completed", "COMPLETED", "Checked Out", "checked out", "Checked-Out",
     "attended", "Attended", "arrived", "Arrived", "closed", "Closed"),
    ("cancelled", "Cancelled", "CANCELLED", "canceled", "Canceled"),
    ("late cancel", "Late Cancel", "Late Cancellation", "late cancellation"),
    ("no-show", "No-Show", "no show", "No Show", "noshow", "NoShow", "missed", "Missed"),
    ("rescheduled", "Rescheduled"),
    ("booked", "Booked", "confirmed", "Confirmed", "pending", "Pending", "scheduled", "Scheduled"),
    ("In Progress", "Waitlisted", "On Hold"),
)  # fmt: skip
_STATUS_VOCAB = tuple(s for group in _STATUSES for s in group)
_STATUS_GROUP = np.array([g for g, group in enumerate(_STATUSES) for _ in group], dtype=np.int64)
_STATUS_LEN = np.array([len(group) for group in _STATUSES], dtype=np.int64)
_STATUS_OFFSET = np.concatenate([[0], np.cumsum(_STATUS_LEN)[:-1]])
_STATUS_P = (0.70, 0.09, 0.03, 0.06, 0.04, 0.05, 0.03)

_TRUE = ("yes", "Yes", "Y", "y", "1", "true", "TRUE", "True")
_FALSE = ("no", "No", "N", "n", "0", "false", "FALSE")
_GRANTED, _MISSING, _DENIED, _REVOKED, _LATE_GRANT = range(5)
_INTERESTS = (
    "Botox", "Botox for hyperhidrosis", "Lip filler", "Weight loss (semaglutide)", "Acne scars",
    "Melasma / dark spots", "Laser hair removal", "Rosacea", "Hair loss (PRP)", "CoolSculpting",
    "Not sure - wants a consult",
)  # fmt: skip
_NOTES = (
    "Has hyperhidrosis, asked about Botox pricing", "Pregnant - wants to wait until after delivery",
    "On Accutane until March; advised to wait", "Allergic to lidocaine",
    'Asked for "Dr. Patel" specifically', "Called twice.\nPrefers evenings, text only",
    "Referred by an existing patient", "Diabetic - semaglutide questions",
    "Interested in financing, payment plan?",
)  # fmt: skip
_PAGES = (
    ("botox", "hyperhidrosis"), ("botox", "forehead-lines"), ("fillers", "lips"),
    ("weight-loss", "semaglutide"), ("laser", "hair-removal"), ("skin", "acne-scars"),
    ("skin", "melasma"),
)  # fmt: skip
_GOOGLE_SOURCES = ("Google Ads", "google / cpc")
_META_SOURCES = ("Facebook", "Instagram", "facebook / paid")
_OTHER_SOURCES = ("Organic Search", "Referral", "Phone Call", "Website", "Yelp")
_B64URL = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)
_SEPS = ("", ".", "_")
_FIRST_ALL, _LAST_ALL = _FIRST + _TEST_FIRST, _LAST + _TEST_LAST
_DOMAIN_ALL = tuple(d for d, _ in _DOMAINS) + _TEST_DOMAINS
