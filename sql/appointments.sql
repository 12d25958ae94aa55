-- Appointments of one clinic changed in the run's window: the example query of a SQL source
-- (clinic YAML: sources.appointments.sql_url + query; read by etl.extract.read_appointments).
--
-- Table layout assumed (a reporting replica or warehouse view of the PMS; adapt the FROM and
-- WHERE to the real schema, keep the output aliases, which are the generic profile's columns):
--
--   patients (
--     patient_id          text primary key,
--     clinic_id           text not null,
--     first_name, last_name, email, phone, zip, city, state, country   text,
--     consent_marketing   boolean,        -- HIPAA marketing authorization on file (SPEC rule 6)
--     consent_at          timestamptz,
--     consent_revoked_at  timestamptz,
--     updated_at          timestamptz not null,
--     date_of_birth       date            -- PHI, never selected
--   )
--   appointments (
--     appointment_id      text primary key,
--     clinic_id           text not null,
--     patient_id          text references patients (patient_id),
--     status              text not null,  -- the PMS's own status word, mapped by the profile
--     start_at            timestamptz not null,
--     paid_total          numeric(12, 2), -- invoice/payment total, refunds negative; not list price
--     currency            char(3),
--     location_id         text,
--     updated_at          timestamptz not null,
--     service, provider, notes             text   -- PHI, never selected
--   )
--
-- Bound parameters (SQLAlchemy text, never string formatting): clinic_id and the run's window
-- [start, end) as timezone-aware UTC timestamps. The window is on updated_at, so a visit
-- closed, cancelled or refunded after its start date is picked up by the night it changed;
-- staging keeps the history and the newest updated_at wins. The patient's updated_at counts
-- too: consent, email and phone live on the patient, and a revocation recorded there changes
-- no appointment, so the night it changed selects every visit of that patient again, each
-- with the later of the two times as its updated_at.
-- A timestamp column without a time zone is read as clinic-local time; prefer timestamptz.
-- On PostgreSQL the session's time zone is set to the clinic's, so such a column is also
-- compared with the start and end parameters as clinic-local time.
-- Amounts: prefer numeric. A real (float4) column, or arithmetic that widens one to a double,
-- reads as the float's shortest digits (760.1, not 760.0999755859375); a real holds only about
-- 7 significant digits, so 1234567.89 stored as real is already 1234567.9 in the database. A
-- value with 9 significant digits or fewer reads as its exact digits, whether double or real:
-- a real holding 1500000.2 holds exactly 1500000.25 and reads so. A double with more than 9
-- that a real holds exactly (1234567.875) reads as the real's digits (1234567.9).
-- Whole-line comments are dropped before the query is parsed; a colon-prefixed word after
-- SQL on the same line would be bound as a parameter.

SELECT
    a.appointment_id,
    a.patient_id,
    p.first_name,
    p.last_name,
    p.email,
    p.phone,
    p.zip,
    p.city,
    p.state,
    p.country,
    a.status,
    a.start_at,
    a.paid_total AS revenue,
    a.currency,
    a.location_id,
    CASE WHEN p.updated_at > a.updated_at THEN p.updated_at ELSE a.updated_at END AS updated_at,
    p.consent_marketing,
    p.consent_at,
    p.consent_revoked_at
FROM appointments AS a
LEFT JOIN patients AS p
    ON p.patient_id = a.patient_id
WHERE a.clinic_id = :clinic_id
    AND (
        (a.updated_at >= :start AND a.updated_at < :end)
        OR (p.updated_at >= :start AND p.updated_at < :end)
    )
ORDER BY updated_at, a.appointment_id
