"""Lookup tables for identifier normalizing: ISO 3166-1 countries, common country names, US
states and the regions that use US ZIP codes.

Why: ``etl.identifiers`` reads countries and US states from codes or names (SPEC rule 9,
``shared/SPEC.md``; the decisions are in the ``etl.identifiers`` docstring and
``shared/reference/ad-platforms.md`` sections C and D); ``lookup_country`` reads a code or a name against these tables.
"""

from __future__ import annotations

from typing import Final

from etl.identifier_text import letters_only

US_ZIP_REGIONS: Final = frozenset({"US", "PR", "VI", "GU", "AS", "MP"})

# ISO 3166-1 alpha-3 followed by alpha-2, all 249 officially assigned codes
_ISO_3166: Final = """
ABWAW AFGAF AGOAO AIAAI ALAAX ALBAL ANDAD AREAE ARGAR ARMAM ASMAS ATAAQ ATFTF ATGAG AUSAU
AUTAT AZEAZ BDIBI BELBE BENBJ BESBQ BFABF BGDBD BGRBG BHRBH BHSBS BIHBA BLMBL BLRBY BLZBZ
BMUBM BOLBO BRABR BRBBB BRNBN BTNBT BVTBV BWABW CAFCF CANCA CCKCC CHECH CHLCL CHNCN CIVCI
CMRCM CODCD COGCG COKCK COLCO COMKM CPVCV CRICR CUBCU CUWCW CXRCX CYMKY CYPCY CZECZ DEUDE
DJIDJ DMADM DNKDK DOMDO DZADZ ECUEC EGYEG ERIER ESHEH ESPES ESTEE ETHET FINFI FJIFJ FLKFK
FRAFR FROFO FSMFM GABGA GBRGB GEOGE GGYGG GHAGH GIBGI GINGN GLPGP GMBGM GNBGW GNQGQ GRCGR
GRDGD GRLGL GTMGT GUFGF GUMGU GUYGY HKGHK HMDHM HNDHN HRVHR HTIHT HUNHU IDNID IMNIM INDIN
IOTIO IRLIE IRNIR IRQIQ ISLIS ISRIL ITAIT JAMJM JEYJE JORJO JPNJP KAZKZ KENKE KGZKG KHMKH
KIRKI KNAKN KORKR KWTKW LAOLA LBNLB LBRLR LBYLY LCALC LIELI LKALK LSOLS LTULT LUXLU LVALV
MACMO MAFMF MARMA MCOMC MDAMD MDGMG MDVMV MEXMX MHLMH MKDMK MLIML MLTMT MMRMM MNEME MNGMN
MNPMP MOZMZ MRTMR MSRMS MTQMQ MUSMU MWIMW MYSMY MYTYT NAMNA NCLNC NERNE NFKNF NGANG NICNI
NIUNU NLDNL NORNO NPLNP NRUNR NZLNZ OMNOM PAKPK PANPA PCNPN PERPE PHLPH PLWPW PNGPG POLPL
PRIPR PRKKP PRTPT PRYPY PSEPS PYFPF QATQA REURE ROURO RUSRU RWARW SAUSA SDNSD SENSN SGPSG
SGSGS SHNSH SJMSJ SLBSB SLESL SLVSV SMRSM SOMSO SPMPM SRBRS SSDSS STPST SURSR SVKSK SVNSI
SWESE SWZSZ SXMSX SYCSC SYRSY TCATC TCDTD TGOTG THATH TJKTJ TKLTK TKMTM TLSTL TONTO TTOTT
TUNTN TURTR TUVTV TWNTW TZATZ UGAUG UKRUA UMIUM URYUY USAUS UZBUZ VATVA VCTVC VENVE VGBVG
VIRVI VNMVN VUTVU WLFWF WSMWS YEMYE ZAFZA ZMBZM ZWEZW
"""
ALPHA3_TO_ALPHA2: Final = {pair[:3]: pair[3:] for pair in _ISO_3166.split()}
ALPHA2: Final = frozenset(ALPHA3_TO_ALPHA2.values())
# keys are lowercase letters only, as ``letters_only`` leaves them ("U.S." -> "us")
COUNTRY_NAMES: Final = {
    "uk": "GB", "unitedstates": "US", "unitedstatesofamerica": "US", "america": "US",
    "canada": "CA", "mexico": "MX", "unitedkingdom": "GB", "greatbritain": "GB", "britain": "GB",
    "england": "GB", "scotland": "GB", "wales": "GB", "northernireland": "GB", "ireland": "IE",
    "australia": "AU", "newzealand": "NZ", "puertorico": "PR", "germany": "DE", "france": "FR",
    "spain": "ES", "italy": "IT", "netherlands": "NL", "holland": "NL", "belgium": "BE",
    "switzerland": "CH", "austria": "AT", "portugal": "PT", "sweden": "SE", "norway": "NO",
    "denmark": "DK", "finland": "FI", "poland": "PL", "greece": "GR", "brazil": "BR",
    "argentina": "AR", "colombia": "CO", "chile": "CL", "india": "IN", "china": "CN",
    "japan": "JP", "southkorea": "KR", "korea": "KR", "singapore": "SG", "philippines": "PH",
    "israel": "IL", "southafrica": "ZA", "unitedarabemirates": "AE", "uae": "AE",
}  # fmt: skip
US_STATES: Final = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi", "minnesota": "mn",
    "mississippi": "ms", "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
    "newhampshire": "nh", "newjersey": "nj", "newmexico": "nm", "newyork": "ny",
    "northcarolina": "nc", "northdakota": "nd", "ohio": "oh", "oklahoma": "ok", "oregon": "or",
    "pennsylvania": "pa", "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va",
    "washington": "wa", "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy",
    "puertorico": "pr", "virginislands": "vi", "usvirginislands": "vi", "guam": "gu",
    "americansamoa": "as", "northernmarianaislands": "mp", "armedforcesamericas": "aa",
    "armedforceseurope": "ae", "armedforcespacific": "ap",
}  # fmt: skip
US_STATE_CODES: Final = frozenset(US_STATES.values())


def lookup_country(text: str) -> str | None:
    """Alpha-2 code of an alpha-2 or alpha-3 code or a known name (any case, punctuation), or None."""
    if text in ALPHA2:
        return text
    key = letters_only(text)
    if key is None:
        return None
    if len(key) == 2 and key.upper() in ALPHA2:
        return key.upper()
    if len(key) == 3 and key.upper() in ALPHA3_TO_ALPHA2:
        return ALPHA3_TO_ALPHA2[key.upper()]
    return COUNTRY_NAMES.get(key)


# ISO 4217 active codes (2026); a currency outside this list is a data error, not a new currency.
ISO_4217 = frozenset([
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BHD", "BIF",
    "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CLP", "CNY", "COP", "CRC",
    "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS",
    "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD",
    "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL",
    "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN", "NAD",
    "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
    "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
    "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
])  # fmt: skip
