-- Per-customer quota settings: suspension and the monthly spending cap.
ALTER TABLE customers ADD COLUMN IF NOT EXISTS suspended BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE customers ADD COLUMN IF NOT EXISTS spending_cap NUMERIC CHECK (spending_cap >= 0);
