// The model every dashboards/*.json must satisfy, built only from Grafana's published types
// (@grafana/schema): the dashboard, its variables, links and annotations, and for each panel
// the options and field config of its panel plugin. tests/test_dashboards.py wraps each JSON
// file in `export const dashboard: DashboardJson = <file>;` and runs `tsc --noEmit`, so an
// unknown property, a misspelt option, a missing required one or a wrong type fails the test.

import type {
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// JSON carries an enum's value, not the TypeScript enum: map every string enum to the union of
// its values (a string literal is not assignable to a TypeScript string enum). Numeric enums
// already accept their numeric values; everything else is kept as it is.
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

// A panel of one plugin type: Grafana's Panel with that plugin's Options, and its FieldConfig as
// the only allowed `fieldConfig.defaults.custom` (the published Panel allows any custom keys).
type PanelOf<TType extends string, TOptions, TCustom> = Omit<Panel, 'type' | 'options' | 'fieldConfig'> & {
  type: TType;
  options: TOptions;
  fieldConfig: Omit<FieldConfigSource, 'defaults'> & {
    defaults: Omit<FieldConfig, 'custom'> & { custom?: TCustom };
  };
};

// The panel plugins wgnest's dashboards use; a new one must be added here (and to __requires).
export type WgnestPanel =
  | PanelOf<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>
  | PanelOf<'table', Table.Options, Table.FieldConfig>
  | PanelOf<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>;

export type WgnestRow = Omit<RowPanel, 'panels'> & { panels: WgnestPanel[] };

// Grafana's "export for sharing externally" adds these top-level keys, which the dashboard
// model itself does not describe: the import inputs (data sources and constants) and the
// plugins the dashboard requires.
interface ExportInput {
  name: string;
  label: string;
  description: string;
  type: 'datasource' | 'constant';
  pluginId?: string;
  pluginName?: string;
  value?: string;
}

interface ExportRequirement {
  type: 'grafana' | 'datasource' | 'panel';
  id: string;
  name: string;
  version: string;
}

export type ExportedDashboard = Omit<Dashboard, 'panels'> & {
  panels?: Array<WgnestPanel | WgnestRow>;
  __inputs?: ExportInput[];
  __requires?: ExportRequirement[];
  __elements?: Record<string, never>;
};

export type DashboardJson = Json<ExportedDashboard>;
