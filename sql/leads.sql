-- Leads of one clinic changed in the run's window: the example query of a SQL source
-- (clinic YAML: sources.leads.sql_url + query; read by etl.extract.read_leads).
--
-- Table layout assumed (the CRM's lead table or a warehouse view of it; adapt the FROM and
-- WHERE to the real schema, keep the output aliases, which are the generic profile's columns):
--
--   leads (
--     lead_id             text primary key,
--     clinic_id           text not null,
--     created_at          timestamptz not null,
--     updated_at          timestamptz not null,
--     first_name, last_name, email, phone, zip                  text,
--     gclid, gbraid, wbraid, fbclid, fbc, fbp                   text,  -- captured on landing
--     consent_marketing   boolean,        -- HIPAA marketing authorization, not a newsletter opt-in
--     consent_at          timestamptz,
--     consent_revoked_at  timestamptz,
--     source, treatment_interest, notes, landing_page_url      text   -- PHI, never selected
--   )
--
-- Bound parameters (SQLAlchemy text, never string formatting): clinic_id and the run's window
-- [start, end) as timezone-aware UTC timestamps. The window is on updated_at, so a consent
-- revoked on an old lead is picked up; rows come oldest change first because, within one
-- result, the later row of a repeated lead_id wins.
-- A timestamp column without a time zone is read as clinic-local time; prefer timestamptz.
-- Whole-line comments are dropped before the query is parsed; a colon-prefixed word after
-- SQL on the same line would be bound as a parameter.

SELECT
    l.lead_id,
    l.created_at,
    l.first_name,
    l.last_name,
    l.email,
    l.phone,
    l.zip,
    l.gclid,
    l.gbraid,
    l.wbraid,
    l.fbclid,
    l.fbc,
    l.fbp,
    l.consent_marketing,
    l.consent_at,
    l.consent_revoked_at
FROM leads AS l
WHERE l.clinic_id = :clinic_id
    AND l.updated_at >= :start
    AND l.updated_at < :end
ORDER BY l.updated_at, l.lead_id
